"""The nodule detector and its runtime adapter: not built yet (issue 17).

Its responsibility: a teacher 3D network and a distilled student with at least 80 % fewer
parameters, registered with the shared model runtime (sliding-window patches of a volume, batched
across studies; inputs (1, D, H, W) in HU), and the post-processing from network output to nodule
centres in patient coordinates, diameters, volume, mean HU, type and confidence.
"""
