"""The reliability suite (issue 7): a package, so its conftest and helpers never shadow other test folders' modules."""
