"""``pydra shell``: the admin shell of a service cluster.

Split by role: :mod:`.commands` (grammar, requests, how replies show),
:mod:`.completer` (tab completion), :mod:`.toolbar` (the live health line),
:mod:`.app` (connecting, ``-c``, and the interactive loop).
"""
