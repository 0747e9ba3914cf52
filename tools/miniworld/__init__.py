"""The miniature world a run of the `mini` profile needs: its scene renderer (for the retrieval corpus) and the
small models trained for it (evals/miniworld trains them; they ship in models/)."""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
