"""The label mapping: diagnosis (dx) to benign / malignant.

Malignant: melanoma, basal cell carcinoma, actinic keratosis / intraepithelial carcinoma
(akiec) and squamous cell carcinoma (scc, as the ISIC archive names it).
Benign: nevus, benign keratosis, dermatofibroma, vascular lesion.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, str] = ("benign", "malignant")
MALIGNANT_INDEX = 1

#: Every diagnosis a dx model can learn, in a fixed order: the ``p_<dx>`` columns of
#: ``python -m lesion.predict`` follow it, so a CSV's columns never depend on the model.
DX_CODES: tuple[str, ...] = ("nv", "mel", "bkl", "bcc", "akiec", "df", "vasc", "scc")

#: Plain words for each diagnosis, for people who are not dermatologists.
DX_NAMES: dict[str, str] = {
    "nv": "melanocytic nevus",
    "mel": "melanoma",
    "bkl": "benign keratosis",
    "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "df": "dermatofibroma",
    "vasc": "vascular lesion",
    "scc": "squamous cell carcinoma",
}

DX_TO_LABEL: dict[str, str] = {
    "mel": "malignant",
    "bcc": "malignant",
    "akiec": "malignant",
    "scc": "malignant",
    "nv": "benign",
    "bkl": "benign",
    "df": "benign",
    "vasc": "benign",
}

# The ISIC archive export spells diagnoses out (diagnosis_3 is the most specific level);
# these are the names it uses for the eight HAM10000 classes and their close relatives.
ISIC_NAME_TO_DX: dict[str, str] = {
    "melanoma": "mel",
    "melanoma invasive": "mel",
    "melanoma in situ": "mel",
    "melanoma, nos": "mel",
    "melanoma metastasis": "mel",
    "basal cell carcinoma": "bcc",
    "actinic keratosis": "akiec",
    "solar or actinic keratosis": "akiec",
    "actinic keratosis/bowen's disease": "akiec",
    "squamous cell carcinoma in situ": "scc",
    "squamous cell carcinoma": "scc",
    "squamous cell carcinoma, invasive": "scc",
    "squamous cell carcinoma, nos": "scc",
    "nevus": "nv",
    "nevus, nos": "nv",
    "seborrheic keratosis": "bkl",
    "pigmented benign keratosis": "bkl",
    "solar lentigo": "bkl",
    "lichen planus like keratosis": "bkl",
    # Older archive exports' spellings of the same benign keratoses (the ISIC 2019 BKL class).
    "lichenoid keratosis": "bkl",
    "lentigo nos": "bkl",
    "benign keratosis": "bkl",
    "dermatofibroma": "df",
    "vascular lesion": "vasc",
    "hemangioma": "vasc",
    "angioma": "vasc",
    "angiokeratoma": "vasc",
    "pyogenic granuloma": "vasc",
}


def label_of(dx: str) -> str:
    """Return ``"benign"`` or ``"malignant"`` for a HAM10000-style dx code; KeyError if unknown."""
    return DX_TO_LABEL[dx.strip().lower()]


def dx_name(dx: str) -> str:
    """Plain words for a dx code (the code itself when we have no words for it)."""
    return DX_NAMES.get(dx, dx)


def label_index(label: str) -> int:
    """Index of a label name in :data:`CLASS_NAMES`."""
    return CLASS_NAMES.index(label)
