"""torchreid_vi: visible-infrared cross-modal person re-identification for torchreid."""
__version__ = '0.1.0'
