"""Local preprocessing at a site: nothing computed here leaves the site except named aggregates."""
