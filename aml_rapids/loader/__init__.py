"""Loader stage: the DALI pipeline that decodes, segments, resizes, augments and normalises every cell."""
