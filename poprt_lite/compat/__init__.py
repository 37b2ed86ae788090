"""Everything that exists to speak PopRT: Converter, get_session, PopRT 1.5's flags, its pass API and pass names."""
