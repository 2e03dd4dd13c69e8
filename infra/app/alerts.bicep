// Log search alerts on Application Insights. The app logs one `event=<name>` marker per notable occurrence
// (structured log lines, traces table); each alert fires when its marker appears at all in the window.
param namePrefix string
param actionGroupName string
param location string
param tags object = {}

@description('Resource id of the Application Insights component the rules query.')
param appInsightsId string

@description('Optional e-mail receiver; empty creates the rules without an action group.')
param alertEmail string = ''

var hasEmail = !empty(alertEmail)

var alertDefinitions = [
  {
    suffix: 'message-poisoned'
    displayName: 'd365-migration: message moved to a poison queue'
    description: 'A queue message failed maxDequeueCount times and was moved to <queue>-poison. Inspect the poison queue, fix the cause, then re-queue or discard the message.'
    query: 'traces | where message has "event=message_poisoned"'
    severity: 1
    muteActionsDuration: 'PT1H'
  }
  {
    suffix: 'record-failed'
    displayName: 'd365-migration: migration record failed'
    description: 'A migration ledger record reached the failed state. Check the ledger row and the logged reason.'
    query: 'traces | where message has "event=record_failed"'
    severity: 2
    muteActionsDuration: 'PT1H'
  }
  {
    suffix: 'needs-attention'
    displayName: 'd365-migration: a migration needs a human'
    description: 'A record is blocked (possibly after the purchase: the customer pays for old and new until someone looks), a detection page failed for good, or the rollout is paused with purchases waiting. The log line carries the reason and the re-drive command (redrive=...).'
    query: 'traces | where message has "event=needs_attention"'
    severity: 2
    muteActionsDuration: 'PT1H'
  }
  {
    suffix: 'refresh-token-expiring'
    displayName: 'd365-migration: Partner Center refresh token close to expiry'
    description: 'The stored Partner Center refresh token is close to its 90-day expiry. Run `python -m d365_migration consent` again.'
    query: 'traces | where message has "event=refresh_token_expiring"'
    severity: 2
    muteActionsDuration: 'PT12H'
  }
  {
    suffix: 'auth-failed'
    displayName: 'd365-migration: Partner Center authentication failed'
    description: 'Getting a Partner Center token failed (expired or revoked refresh token, wrong client secret, missing Key Vault secret). Re-run consent and check the Key Vault references.'
    query: 'traces | where message has "event=auth_failed"'
    severity: 1
    muteActionsDuration: 'PT1H'
  }
]

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (hasEmail) {
  name: actionGroupName
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'd365mig'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

resource rules 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = [
  for a in alertDefinitions: {
    name: '${namePrefix}-${a.suffix}'
    location: location
    tags: tags
    kind: 'LogAlert'
    properties: {
      displayName: a.displayName
      description: a.description
      severity: a.severity
      enabled: true
      scopes: [
        appInsightsId
      ]
      evaluationFrequency: 'PT15M'
      windowSize: 'PT15M'
      criteria: {
        allOf: [
          {
            query: a.query
            timeAggregation: 'Count'
            operator: 'GreaterThan'
            threshold: 0
            failingPeriods: {
              numberOfEvaluationPeriods: 1
              minFailingPeriodsToAlert: 1
            }
          }
        ]
      }
      autoMitigate: false
      muteActionsDuration: a.muteActionsDuration
      actions: {
        actionGroups: hasEmail ? [actionGroup.id] : []
      }
    }
  }
]

output ruleNames array = [for (a, i) in alertDefinitions: rules[i].name]
