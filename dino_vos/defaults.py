"""Default values shared by the library and the command line.

Kept in a module without heavy imports so that ``dino-vos --help`` and the commands' option
parsing never load torch; the library modules import their defaults from here.
"""

from __future__ import annotations

#: ``dino-vos demo``: frames, (height, width) and objects of the generated clip.
DEMO_FRAMES = 24
DEMO_SIZE = (240, 352)
DEMO_OBJECTS = 4
#: What ``dino-vos demo`` writes into its --out folder.
DEMO_OUTPUTS = frozenset({"clip", "masks", "overlay.mp4"})

#: Attention masks keep this fraction of each map's mass (DINO's visualisation default).
ATTENTION_THRESHOLD = 0.6
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo")

#: Image baselines (``docs/protocol.md#image-baselines``).
IMAGE_SIZE = 224
RESIZE_SIZE = 256
KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
KNN_MEMORY_BUDGET_MB = 512
