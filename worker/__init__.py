"""The Jennah worker: DeploymentService on top of a job store, a provider and an event log."""
