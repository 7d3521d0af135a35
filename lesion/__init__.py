"""lesion: benign vs malignant dermoscopy classification with Grad-CAM and OOD rejection.

A demonstration and research tool, not a medical device: it does not diagnose.
This package never imports Streamlit; the app (``streamlit_app.py``, ``app_pages/``, ``lesion_app/``)
is a thin layer over it.
"""

__version__ = "0.1.0"
