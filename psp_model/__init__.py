"""psp-fl core library: data layouts, preprocessing, models and evaluation. Imports no Flower."""

__version__ = "0.1.0"

import logging as _logging

# MONAI warns on every DICOM reader it builds that the optional GPU decoder is missing; we read DICOM
# with pydicom directly and the warning drowned the progress bars.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)

import warnings as _warnings

_warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
