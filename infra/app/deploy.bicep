// Optional code deployment for "Deploy to Azure" (no azd): onedeploy pulls a ready-to-run zip (dependencies
// already under .python_packages/lib/site-packages, built for Linux + Python 3.13 by scripts/build_package.sh) and
// publishes it to the Flex deployment container. remoteBuild is false: nothing is built in Azure.
param functionAppName string

@description('HTTPS URL of the release asset d365-migration.zip (must be reachable by Azure without credentials).')
param packageUri string

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource oneDeploy 'Microsoft.Web/sites/extensions@2024-04-01' = {
  parent: functionApp
  name: 'onedeploy'
  #disable-next-line BCP187
  properties: {
    packageUri: packageUri
    remoteBuild: false
  }
}
