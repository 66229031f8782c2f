"""Central schema revisions, oldest first; a released revision is never edited, only followed by a new one."""
