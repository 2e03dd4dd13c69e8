// Key Vault for the Partner Center credentials (Secure Application Model):
//   partner-center-client-secret   the app registration's client secret
//   partner-center-refresh-token   the app+user refresh token; the app writes back each rotated token
// The template creates NO secret values: `python -m d365_migration consent` stores them after provisioning. The
// function app reads them through Key Vault references (api.bicep) and writes the rotated refresh token with its
// managed identity (Key Vault Secrets Officer, rbac.bicep).
//
// RBAC authorization only (no access policies). Public network access stays enabled so the Functions platform and
// the partner's workstation (consent) can reach it; for a private deployment add a private endpoint + VNet
// integration on the function app and set publicNetworkAccess to 'Disabled' (not part of this template).
param name string
param location string
param tags object = {}

@description('Log Analytics workspace for the vault\'s audit log; empty to skip.')
param logAnalyticsWorkspaceId string = ''

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    accessPolicies: []
  }
}

resource auditLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (!empty(logAnalyticsWorkspaceId)) {
  name: 'audit-to-log-analytics'
  scope: vault
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'audit'
        enabled: true
      }
    ]
  }
}

output id string = vault.id
output name string = vault.name
// https://<name>.vault.azure.net/ (with the trailing slash)
output uri string = vault.properties.vaultUri
