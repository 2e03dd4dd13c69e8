// Log Analytics workspace + workspace-based Application Insights with local (instrumentation key) auth disabled:
// telemetry is accepted only from Entra identities holding Monitoring Metrics Publisher (see rbac.bicep and the
// APPLICATIONINSIGHTS_AUTHENTICATION_STRING app setting).
param logAnalyticsName string
param appInsightsName string
param location string
param tags object = {}

@minValue(30)
@maxValue(730)
param retentionInDays int = 30

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    DisableLocalAuth: true
    publicNetworkAccessForIngestion: 'Enabled'
    publicNetworkAccessForQuery: 'Enabled'
  }
}

output logAnalyticsWorkspaceId string = logAnalytics.id
output appInsightsId string = appInsights.id
output appInsightsName string = appInsights.name
// Not a secret: with DisableLocalAuth the key in it cannot be used to send telemetry without an Entra token.
output appInsightsConnectionString string = appInsights.properties.ConnectionString
