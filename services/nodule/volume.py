"""CT volume assembly from a series' instances: not built yet (issue 17).

Its responsibility: group by series and split by orientation, size and acquisition; sort slices
by ImagePositionPatient along the slice normal; spacing from positions, not SliceThickness; HU from
the rescale slope and intercept with padding clipped; LPS orientation kept explicit. Mixed series,
missing or duplicate slices, gantry tilt, non-CT and undecodable files become a clear per-series
error, never a crash.
"""
