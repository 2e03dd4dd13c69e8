// Storage for the Functions host, the Flex deployment package, the work queues and the migration ledger.
// Shared-key access is disabled: every caller (host, app code, deployer) authenticates with Entra ID.
param name string
param location string
param tags object = {}

@description('Table for the migration ledger (LEDGER_TABLE).')
param ledgerTableName string = 'migrations'

@description('Table through which all instances share the Partner Center request budgets (PARTNER_CENTER_BUDGET_TABLE).')
param budgetTableName string = 'partnercenterbudget'

@description('Blob container Flex Consumption deploys the app package from.')
param deploymentContainerName string = 'app-package'

// The queue chain. The host moves a message to <queue>-poison after maxDequeueCount (host.json) failed attempts;
// the poison queues are created up front so they exist for inspection and alerting before the first failure.
var queueNames = [
  'scan-customers'
  'purchase-new'
  'reassign-licenses'
  'suspend-old'
]
var poisonQueueNames = [for q in queueNames: '${q}-poison']

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [
  for q in concat(queueNames, poisonQueueNames): {
    parent: queueService
    name: q
  }
]

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource ledgerTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: ledgerTableName
}

resource budgetTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: budgetTableName
}

output id string = storage.id
output name string = storage.name
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output queueEndpoint string = storage.properties.primaryEndpoints.queue
output tableEndpoint string = storage.properties.primaryEndpoints.table
output deploymentContainerName string = deploymentContainer.name
output queueNames array = queueNames
