"""Spatial Transformer Networks (Jaderberg et al., https://arxiv.org/abs/1506.02025).

STN needs no architecture of its own: the transformer is the ``stn`` block
(attnzoo/blocks/spatial.py), placed in front of any backbone by a spec, e.g. the zoo's
``stn_resnet18`` puts it before ``conv1`` of timm's resnet18.
"""
