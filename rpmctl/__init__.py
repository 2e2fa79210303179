"""Control plane of the RPM pipeline: settings, secrets, broker and service processes, the `rpm` CLI."""
