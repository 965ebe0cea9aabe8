"""What training and serving share: the ensemble artefact's manifest, the ensemble maths, the ECE bins.

numpy and pydantic only: no torch, no gRPC. `training` writes artefacts with it and `service`
reads them with it, and neither imports the other.
"""
