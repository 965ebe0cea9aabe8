"""Export an ensemble to ONNX with its manifest: `valley-train export`.

Writes `REPO/NAME/VERSION/` with one graph per member (`member-XX.onnx`: uint8 pixels in,
logits out), one fused graph (`ensemble.onnx`: every member, the fitted temperature, the
mean and the uncertainty outputs), `manifest.json` (schema in `artefact.manifest`), and two PNGs of the test split
(`reliability.png` before and after temperature scaling, `risk-coverage.png` with the abstention thresholds).
Every graph passes `onnx.checker`'s full check and matches PyTorch within 1e-4 on real
validation images before the version directory appears; it appears by a single rename.

With `front` (an SWA or distilled run), that network's graph too (`front.onnx`; `training.front`), fitted into
the cascade as its first stage where that pays on validation. The members are written best first by validation NLL
unless `member_order` says as trained: a request for N members, and each cascade stage, then gets the best N.

With `precisions`, every graph again at INT8 or FP16 (`member-XX.int8.onnx`, `ensemble.int8.onnx`, ...;
`training.quantize`), measured on the validation and test splits beside FP32 and recorded in the manifest's
`variants`. A variant whose validation NLL or accuracy misses its tolerance fails the export.
"""
