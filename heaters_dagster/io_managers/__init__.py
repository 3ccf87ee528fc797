"""IO managers: files (clip files, sprites, keyframes) into the artifact store with their rows, and
embeddings into pgvector. The executor calls ``persist`` inside the transaction that also makes
the stage's success transition; ``load_input`` gives downstream code the stored records."""

from heaters_dagster.io_managers.artifacts import ArtifactIOManager  # noqa: F401
