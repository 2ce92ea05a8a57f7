"""The sharder service."""
