"""d365_migration: move customers off retired Dynamics 365 Qualified Offers, unattended and safely."""
