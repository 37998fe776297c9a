"""The emotion model and its runtime adapter: not built yet (issue 18).

Its responsibility: an audio encoder (wav2vec2-style or log-mel CNN + transformer, input 16 kHz
mono samples) and a text encoder fused by cross-modal attention, working with either modality
missing, registered with the shared model runtime so utterances of concurrent calls share
batches; the same loading code accepts a pretrained checkpoint from a local directory.
"""
