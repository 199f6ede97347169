"""Constants of the node's secondary captures: sizes, colours, texts."""

from __future__ import annotations

from inference.vocabulary import NOT_FOR_DIAGNOSTIC_USE  # noqa: F401  (the statement every result carries)

#: Longest side of any secondary capture the node writes (pixels).
MAX_SIDE = 2048
#: Small source images are enlarged to at least this long side so that the burned-in text stays legible.
MIN_SIDE = 1024
#: The text panel below a heatmap is at least this wide (a narrow image gets a black margin on its right).
MIN_PANEL_WIDTH = 768

#: Heatmap colour map (matplotlib name) and the largest opacity of the overlay.
COLOUR_MAP = "jet"
MAX_ALPHA = 0.55
#: Map values below this are not drawn (the radiograph shows through unchanged); above it the overlay's
#: opacity rises linearly to MAX_ALPHA at 1.
MAP_FLOOR = 0.30

# RGB colours
DEFINITE = (255, 48, 48)
SUSPECTED = (255, 190, 0)
TEXT = (255, 255, 255)
WARNING_TEXT = (255, 220, 0)
PANEL = (0, 0, 0)
GRID = (90, 90, 90)
ABSENT = (170, 230, 170)
#: anomaly regions (label-free localisation): a colour the jet map does not use
ANOMALY = (255, 64, 255)

#: Font files shipped with matplotlib (DejaVu, a free font); Pillow's default font as fallback.
FONT_REGULAR = "DejaVuSans.ttf"
FONT_BOLD = "DejaVuSans-Bold.ttf"

#: Conversion Type of a secondary capture produced by a workstation (PS3.3 C.8.6.1).
CONVERSION_TYPE = "WSD"
