"""Pure media functions (no Dagster imports): probe, normalise, scene detection, clip cutting,
sprite sheets, keyframes and CLIP embeddings. Each returns a typed result dataclass."""
