// The app's single user-assigned managed identity: host storage (AzureWebJobsStorage__*), the deployment
// container, Application Insights ingestion, Key Vault references and the app's own azure-identity calls.
// User-assigned (not system-assigned) so role assignments can be created before the function app exists.
param name string
param location string
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
