"""The gateway: the public Connect face of Jennah (auth → ring → forward → failover)."""
