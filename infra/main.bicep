// d365-migration: everything the Functions app needs in the partner's own Azure subscription.
//
// Deploy with `azd up` (reads main.parameters.json), with
// `az deployment sub create -l <region> -f infra/main.bicep -p environmentName=<name>`, or with the
// "Deploy to Azure" button pointing at the compiled main.json from a GitHub release (see .github/workflows/release.yml).
//
// Keyless by design: the storage account refuses shared keys, Application Insights refuses instrumentation-key
// ingestion, and the app reaches Storage, Application Insights and Key Vault with one user-assigned managed
// identity. The deploying principal needs Owner or User Access Administrator (the template creates role assignments).
//
// Secrets: the template creates the Key Vault but NO secret values. After provisioning, the partner runs
// `python -m d365_migration consent`, which stores `partner-center-client-secret` and `partner-center-refresh-token`
// in the vault. The app settings PARTNER_CENTER_CLIENT_SECRET / PARTNER_CENTER_REFRESH_TOKEN are Key Vault
// references to those versionless secrets, resolved by the platform with the same managed identity.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the environment (azd AZURE_ENV_NAME); used to derive unique resource names.')
param environmentName string

@minLength(1)
@description('Region for all resources. It must offer Flex Consumption: az functionapp list-flexconsumption-locations.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group to create; default rg-<environmentName>.')
param resourceGroupName string = ''

@description('Optional object id of the person (or pipeline) running the deployment. It gets the same data roles as the app, so `python -m d365_migration consent` and local debugging work with keys disabled.')
param principalId string = ''

@description('Kind of principal in principalId.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param principalType string = 'User'

@description('Optional Key Vault name override (3-24 characters). Purge protection keeps a deleted vault name reserved for the retention period, so a re-deployment after `azd down` needs a new name.')
param keyVaultName string = ''

// ---- Application settings ---------------------------------------------------------------------------------------

@description('Partner (CSP) Entra tenant id; PARTNER_CENTER_TENANT_ID. Can be set after deployment.')
param partnerCenterTenantId string = ''

@description('Application (client) id of the partner\'s Partner Center app registration; PARTNER_CENTER_CLIENT_ID.')
param partnerCenterClientId string = ''

@description('Partner Center API endpoint; PARTNER_CENTER_ENDPOINT.')
param partnerCenterEndpoint string = 'https://api.partnercenter.microsoft.com'

@description('Entra authority used for Partner Center tokens; PARTNER_CENTER_AUTHORITY.')
param partnerCenterAuthority string = 'https://login.microsoftonline.com'

@description('REPLACEMENT_OFFERS: JSON object family -> audience -> catalog item id (productId:skuId:availabilityId) or legacy offer GUID.')
param replacementOffers string = '{}'

@description('REPLACEMENT_BILLING_CYCLE for new-commerce purchases.')
@allowed([
  'monthly'
  'annual'
  'triennial'
])
param replacementBillingCycle string = 'monthly'

@description('REPLACEMENT_TERM_DURATION (ISO 8601), e.g. P1M or P1Y.')
param replacementTermDuration string = 'P1Y'

@description('REPLACEMENT_QUANTITY_POLICY: old_quantity (buy the old subscription\'s quantity) or license_holders (buy one seat per user holding the old license).')
@allowed([
  'old_quantity'
  'license_holders'
])
param replacementQuantityPolicy string = 'old_quantity'

@description('DETECT_SCHEDULE: NCRONTAB (six fields) for the detect_expiring timer. Always UTC on Flex Consumption.')
param detectSchedule string = '0 0 6 * * *'

@description('EXPIRY_WINDOW_DAYS: migrate subscriptions that end within this many days.')
@minValue(1)
@maxValue(3650)
param expiryWindowDays int = 60

@description('RETIRED_OFFERS_EXTRA: additional retired offer ids, comma separated.')
param retiredOffersExtra string = ''

@description('CUSTOMER_DENYLIST: comma-separated customer tenant ids never touched.')
param customerDenylist string = ''

@description('PARTNER_CENTER_REQUESTS_PER_MINUTE: the partner tenant\'s budget for customer, subscription, order and cart calls, shared by all instances and functions.')
@minValue(1)
param partnerCenterRequestsPerMinute int = 500

@description('PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE: the partner tenant\'s budget for user, license and subscribed-SKU calls, shared by all instances and functions.')
@minValue(1)
param partnerCenterLicenseRequestsPerMinute int = 300

@description('PARTNER_CENTER_MAX_CONCURRENCY: concurrent Partner Center requests per invocation.')
@minValue(1)
@maxValue(256)
param partnerCenterMaxConcurrency int = 16

@description('PROVISIONING_POLL_SECONDS: delay between checks that a new subscription is provisioned.')
@minValue(0)
@maxValue(3600)
param provisioningPollSeconds int = 60

@description('PROVISIONING_TIMEOUT_MINUTES: give up waiting for provisioning after this long.')
@minValue(1)
param provisioningTimeoutMinutes int = 1440

@description('INVOCATION_BUDGET_SECONDS: work per invocation before re-queueing the rest (below host.json functionTimeout).')
@minValue(10)
param invocationBudgetSeconds int = 480

@description('LEDGER_TABLE: Azure Table holding the per-subscription migration ledger.')
param ledgerTableName string = 'migrations'

@description('PARTNER_CENTER_BUDGET_TABLE: Azure Table through which all instances share the Partner Center request budgets.')
param partnerCenterBudgetTableName string = 'partnercenterbudget'

// ---- Scale, alerts, package --------------------------------------------------------------------------------------

// Scale-out cap. Partner Center throttles per PARTNER tenant (all callers of one partner share one budget), so
// more instances do not mean more throughput. The request budget does NOT depend on this number: every instance of
// every function draws from the same PARTNER_CENTER_*_REQUESTS_PER_MINUTE budgets through a table in the app's
// storage account (Flex scales each function on its own, so a cap is not a count of the app's instances). Note:
// values below 40 were rolled out region by region in 2026; if a region rejects the value, 40 works too.
@description('Flex Consumption maximumInstanceCount. Kept small on purpose: Partner Center rate limits are per partner tenant.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 4

@description('Optional e-mail address for alerts (poison messages, failed records, expiring refresh token, auth failures). Empty: alerts fire without notifications.')
param alertEmail string = ''

@description('Optional HTTPS URL of a ready-to-run package zip (the release asset d365-migration.zip). When set, the template deploys it with onedeploy; leave empty for azd, which deploys the code itself.')
param packageUri string = ''

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
  application: 'd365-migration'
}
var rgName = !empty(resourceGroupName) ? resourceGroupName : '${abbrs.resourcesResourceGroups}${environmentName}'
var functionAppName = '${abbrs.webSitesFunctions}d365-${resourceToken}'
var vaultName = !empty(keyVaultName) ? keyVaultName : '${abbrs.keyVaultVaults}d365-${resourceToken}'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: rgName
  location: location
  tags: tags
}

module identity 'app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}d365-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}d365${resourceToken}'
    location: location
    tags: tags
    ledgerTableName: ledgerTableName
    budgetTableName: partnerCenterBudgetTableName
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}d365-${resourceToken}'
    appInsightsName: '${abbrs.insightsComponents}d365-${resourceToken}'
    location: location
    tags: tags
  }
}

module keyVault 'app/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: vaultName
    location: location
    tags: tags
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsWorkspaceId
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
    keyVaultName: keyVault.outputs.name
    identityPrincipalId: identity.outputs.principalId
    userPrincipalId: principalId
    userPrincipalType: principalType
  }
}

module api 'app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: functionAppName
    planName: '${abbrs.webServerFarms}d365-${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageBlobEndpoint: storage.outputs.blobEndpoint
    storageQueueEndpoint: storage.outputs.queueEndpoint
    storageTableEndpoint: storage.outputs.tableEndpoint
    deploymentContainerName: storage.outputs.deploymentContainerName
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
    keyVaultUri: keyVault.outputs.uri
    maximumInstanceCount: maximumInstanceCount
    partnerCenterTenantId: partnerCenterTenantId
    partnerCenterClientId: partnerCenterClientId
    partnerCenterEndpoint: partnerCenterEndpoint
    partnerCenterAuthority: partnerCenterAuthority
    replacementOffers: replacementOffers
    replacementBillingCycle: replacementBillingCycle
    replacementTermDuration: replacementTermDuration
    replacementQuantityPolicy: replacementQuantityPolicy
    detectSchedule: detectSchedule
    expiryWindowDays: expiryWindowDays
    retiredOffersExtra: retiredOffersExtra
    customerDenylist: customerDenylist
    partnerCenterRequestsPerMinute: partnerCenterRequestsPerMinute
    partnerCenterLicenseRequestsPerMinute: partnerCenterLicenseRequestsPerMinute
    partnerCenterMaxConcurrency: partnerCenterMaxConcurrency
    provisioningPollSeconds: provisioningPollSeconds
    provisioningTimeoutMinutes: provisioningTimeoutMinutes
    invocationBudgetSeconds: invocationBudgetSeconds
    ledgerTableName: ledgerTableName
    partnerCenterBudgetTableName: partnerCenterBudgetTableName
  }
}

module alerts 'app/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    namePrefix: '${abbrs.insightsScheduledQueryRules}d365-${resourceToken}'
    actionGroupName: '${abbrs.insightsActionGroups}d365-${resourceToken}'
    location: location
    tags: tags
    appInsightsId: monitoring.outputs.appInsightsId
    alertEmail: alertEmail
  }
}

// Optional: push the released package (button deployments). onedeploy writes the zip to the deployment container
// with the app's identity, so it must wait for the role assignments.
module deployPackage 'app/deploy.bicep' = if (!empty(packageUri)) {
  name: 'deploy-package'
  scope: rg
  params: {
    functionAppName: api.outputs.name
    packageUri: packageUri
  }
  dependsOn: [
    rbac
  ]
}

// ---- Outputs (azd writes them into .azure/<env>/.env) -----------------------------------------------------------
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output RESOURCE_GROUP string = rg.name
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = api.outputs.name
output SERVICE_API_NAME string = api.outputs.name
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_KEY_VAULT_URI string = keyVault.outputs.uri
// Same value under the app-setting name, so `python -m d365_migration consent` can read it from the azd env.
output KEY_VAULT_URL string = keyVault.outputs.uri
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_STORAGE_QUEUE_ENDPOINT string = storage.outputs.queueEndpoint
output AZURE_STORAGE_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output AZURE_USER_ASSIGNED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output AZURE_USER_ASSIGNED_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.appInsightsName
