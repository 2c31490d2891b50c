"""Planning: hardware catalog, cluster presets and the analytical cost model."""
