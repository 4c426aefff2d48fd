"""Calibration: texts and windows, the block-by-block runner, several processes, activation stores, layer-wise loading."""
