"""What the dashboard shows: `sampler` reads NVML and the host, `metrics` scrapes vLLM's
/metrics, `timeline` turns both into start progress and a memory breakdown."""
