"""Code that several test files share, one copy each.

- ``hub_server``: a loopback HTTP server that plays the Hugging Face Hub;
- ``modules``: non-trivial weights for a test (random parameters, BatchNorm weights
  and statistics, a peer's weights copied by order);
- ``blocks``: a block built for a formula test, and the pieces of those formulas;
- ``specs``: a spec on a timm ResNet, the message of a spec error, a zoo model built
  for a small input;
- ``digits``: digits_cbam_tiny, the small zoo model of the weight tests;
- ``timm_twin``: resnet50_se and its timm twin seresnet50;
- ``payloads``: a pickle that leaves a mark when unpickled;
- ``paths``: where the repository's folders are.

Fixtures built on them are in tests/conftest.py.
"""
