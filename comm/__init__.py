"""Process groups, rank topology and collectives of flat buffers.

``world.py`` starts and stops process groups (gloo on CPU, ``"cpu:gloo,cuda:nccl"`` on GPU), ``topology.py`` maps
ranks to (data-parallel replica, pipeline stage, node), ``collectives.py`` runs reduce-scatter and all-gather of flat
buffers with explicit timeouts and classifies their errors.
"""
