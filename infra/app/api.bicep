// The function app: Flex Consumption (Linux), Python 3.13, v1 programming model (function folders with
// function.json). One user-assigned identity for everything; no keys or connection-string secrets in app settings.
param name string
param planName string
param location string
param tags object = {}

@description('Resource id of the user-assigned managed identity.')
param identityId string

@description('Client id of the user-assigned managed identity.')
param identityClientId string

param storageBlobEndpoint string
param storageQueueEndpoint string
param storageTableEndpoint string
param deploymentContainerName string
param appInsightsConnectionString string

@description('Vault URI with trailing slash, e.g. https://kv-x.vault.azure.net/')
param keyVaultUri string

// Partner Center rate limits apply per partner tenant; the app shares them through a table, whatever this is.
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

param pythonVersion string = '3.13'

// Application settings (every one the code reads: d365_migration/_settings.py APP_SETTINGS).
param partnerCenterTenantId string
param partnerCenterClientId string
param partnerCenterEndpoint string
param partnerCenterAuthority string
param replacementOffers string
param replacementBillingCycle string
param replacementTermDuration string
param replacementQuantityPolicy string
param detectSchedule string
param expiryWindowDays int
param retiredOffersExtra string
param customerDenylist string
param partnerCenterRequestsPerMinute int
param partnerCenterLicenseRequestsPerMinute int
param partnerCenterMaxConcurrency int
param provisioningPollSeconds int
param provisioningTimeoutMinutes int
param invocationBudgetSeconds int
param ledgerTableName string
param partnerCenterBudgetTableName string

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    // Key Vault references in app settings are resolved with the UAMI (default would be a system identity).
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        // Capped: Partner Center throttles per partner tenant, not per instance (see main.bicep).
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

// No FUNCTIONS_WORKER_RUNTIME / WEBSITE_RUN_FROM_PACKAGE: on Flex Consumption the runtime comes from
// functionAppConfig.runtime and the package from functionAppConfig.deployment. No AzureWebJobsStorage connection
// string either: the storage account has shared keys disabled, so the host uses the identity-based
// AzureWebJobsStorage__* family below (the queue bindings use "connection": "AzureWebJobsStorage" and share it).
resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: {
    // Host storage and queue/table bindings, identity based.
    AzureWebJobsStorage__credential: 'managedidentity'
    AzureWebJobsStorage__clientId: identityClientId
    AzureWebJobsStorage__blobServiceUri: storageBlobEndpoint
    AzureWebJobsStorage__queueServiceUri: storageQueueEndpoint
    AzureWebJobsStorage__tableServiceUri: storageTableEndpoint
    // azure-identity (DefaultAzureCredential / ManagedIdentityCredential) in the app code picks the UAMI.
    AZURE_CLIENT_ID: identityClientId
    // Entra-only telemetry ingestion (local auth is disabled on the App Insights resource).
    APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'

    // Partner Center (Secure Application Model). The two secrets are Key Vault references, never values; they
    // resolve once `python -m d365_migration consent` has stored them (until then the app sees the unresolved
    // reference text and must treat it as "not configured").
    PARTNER_CENTER_AUTH: 'app-user'
    PARTNER_CENTER_ENDPOINT: partnerCenterEndpoint
    PARTNER_CENTER_AUTHORITY: partnerCenterAuthority
    PARTNER_CENTER_TENANT_ID: partnerCenterTenantId
    PARTNER_CENTER_CLIENT_ID: partnerCenterClientId
    PARTNER_CENTER_CLIENT_SECRET: '@Microsoft.KeyVault(SecretUri=${keyVaultUri}secrets/partner-center-client-secret/)'
    PARTNER_CENTER_REFRESH_TOKEN: '@Microsoft.KeyVault(SecretUri=${keyVaultUri}secrets/partner-center-refresh-token/)'
    KEY_VAULT_URL: keyVaultUri

    // Behaviour. The rollout controls (live or dry run, allow-list or all customers, purchase brake, pause) are NOT
    // deployment parameters: they are kept in the ledger's table and changed with `python -m d365_migration rollout`,
    // so a re-deploy cannot widen them. These three values are only the first-deploy defaults (read while nothing
    // is stored yet), and they are fixed to the safe ones: dry run, no customers, 50 purchases per run.
    DRY_RUN: 'true'
    CUSTOMER_ALLOWLIST: ''
    MAX_PURCHASES_PER_RUN: '50'
    DETECT_SCHEDULE: detectSchedule
    EXPIRY_WINDOW_DAYS: string(expiryWindowDays)
    MIGRATION_PATH_POLICY: 'runbook_only' // _native_path: the runbook until the partner opts into native moves
    REPLACEMENT_OFFERS: replacementOffers
    REPLACEMENT_BILLING_CYCLE: replacementBillingCycle
    REPLACEMENT_TERM_DURATION: replacementTermDuration
    REPLACEMENT_QUANTITY_POLICY: replacementQuantityPolicy
    RETIRED_OFFERS_EXTRA: retiredOffersExtra
    CUSTOMER_DENYLIST: customerDenylist
    LEDGER_TABLE: ledgerTableName

    // Throttling and time budgets.
    PARTNER_CENTER_REQUESTS_PER_MINUTE: string(partnerCenterRequestsPerMinute)
    PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE: string(partnerCenterLicenseRequestsPerMinute)
    PARTNER_CENTER_MAX_CONCURRENCY: string(partnerCenterMaxConcurrency)
    // The per-minute budgets above are the partner tenant's: every instance and function claims short blocks of
    // them from this table (ETag-checked), so together they never exceed them, however the platform scales.
    PARTNER_CENTER_BUDGET_TABLE: partnerCenterBudgetTableName
    PARTNER_CENTER_BUDGET_BLOCK_SECONDS: '1.0'
    // While that table is unreachable, an instance paces itself at this share of each budget (and logs it).
    PARTNER_CENTER_FALLBACK_SHARE: '0.1'
    PARTNER_CENTER_TIMEOUT_SECONDS: '60'
    PROVISIONING_POLL_SECONDS: string(provisioningPollSeconds)
    PROVISIONING_TIMEOUT_MINUTES: string(provisioningTimeoutMinutes)
    // The license step's waits, each by elapsed time (provisioning status refreshes about every 15 minutes).
    PROVISIONING_STATUS_WAIT_MINUTES: '60'
    SUBSCRIBED_SKU_WAIT_MINUTES: '60'
    FREE_UNITS_WAIT_MINUTES: '60'
    // A lost write (legacy order, native move) that Partner Center does not show is re-sent only after this long.
    LOST_WRITE_RESEND_WAIT_SECONDS: '900'
    INVOCATION_BUDGET_SECONDS: string(invocationBudgetSeconds)
  }
}

// No publishing credentials (FTP / SCM basic auth); deployments go through Entra (azd, az, onedeploy).
resource ftpCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

output id string = functionApp.id
output name string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
