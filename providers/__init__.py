"""Mobile-money provider adapters, one package each, with a simulator that speaks its protocol."""
