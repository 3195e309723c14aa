"""What finished stages produced, read back: result.json records, provenance, tables, report.md and report.png."""
