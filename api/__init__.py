"""The FineTuneJob contract."""
