"""Everything that exists to speak PopRT: Converter, get_session, PopRT 1.5's flags, its pass API and pass names.

Importing this package teaches the pass registry PopRT's pass names and pass API (poprt_names,
poprt_api add themselves to it); `import poprt_lite` does.
"""

from poprt_lite.compat import poprt_api, poprt_names  # noqa: F401  (they register into passes.registry)
