"""fleet controller: HTTP dispatch, result collection and presence for fleet agents."""
