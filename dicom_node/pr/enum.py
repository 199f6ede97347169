"""Constants of the node's presentation states: layers, colours, line styles, texts."""

from __future__ import annotations

from dicom_node.sc import enum as sc_enum

#: Grayscale Softcopy Presentation State Storage
SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.11.1"

#: Content Label (CS, at most 16 characters, upper case) of every presentation state the node writes
CONTENT_LABEL = "AI_FINDINGS"

# -- graphic layers: name (CS, <= 16), order (lower drawn first), description --------------------------------
LAYER_REGIONS = "AI_REGIONS"
LAYER_FRACTURE = "AI_FRACTURE"
LAYER_TEXT = "AI_TEXT"
#: the layer the overlay bitmap of the boxes is activated on (below the vector graphics)
LAYER_OVERLAY = "AI_BOX_BITMAP"
LAYER_ORDER = {LAYER_OVERLAY: 0, LAYER_REGIONS: 1, LAYER_FRACTURE: 2, LAYER_TEXT: 3}
LAYER_DESCRIPTIONS = {
    LAYER_REGIONS: "AI anomaly regions: boxes of the anomaly map",
    LAYER_FRACTURE: "AI fracture boxes: solid = definite, dotted = suspected",
    LAYER_TEXT: "AI findings of the image, intended-use statement",
    LAYER_OVERLAY: "AI boxes as a bitmap, for renderers without vector graphics",
}

# -- colours (RGB, converted to the layers' CIELab recommended display values) ----------------------------------
#: fracture boxes in the colours of the heatmap capture: red when definite, amber when suspected
FRACTURE_DEFINITE = sc_enum.DEFINITE
FRACTURE_SUSPECTED = sc_enum.SUSPECTED
#: anomaly regions: the heatmap's magenta
REGIONS = sc_enum.ANOMALY
#: text: the warning yellow of the captures
TEXT = sc_enum.WARNING_TEXT
#: the overlay bitmap: the fracture boxes' colour when there are any, else the regions'
#: Graphic Layer Recommended Display Grayscale Value of every layer (white: a P-value, 0..0xFFFF)
GRAYSCALE = 0xFFFF

# -- dotted lines -------------------------------------------------------------------------------------------------
#: a dotted (suspected) box is drawn as dashes of this fraction of the image's long side, with gaps as long
DASH_FRACTION = 1 / 150
#: shortest dash (pixels)
MIN_DASH = 4.0

# -- overlay: the boxes as a bitmap, for renderers that draw no vector graphics (dcmtk, print) ---------------------
#: the one overlay group of a presentation state (dicom3tools' GSPS checks know group 6000 only)
OVERLAY_GROUP = 0x6000
#: line width of the boxes in the overlay, as a fraction of the image's long side (at least 1 pixel)
OVERLAY_LINE_FRACTION = 1 / 800

# -- text ---------------------------------------------------------------------------------------------------------
#: height of a line of text as a fraction of the image's long side (at least MIN_TEXT_HEIGHT pixels)
TEXT_HEIGHT_FRACTION = 1 / 60
MIN_TEXT_HEIGHT = 12.0
#: rough width of a character in units of the line height (for text bounding boxes)
CHAR_WIDTH = 0.6
