"""The app on top of the layers: the CLI, config files, export and generate, keys, the status view and
the helpers tests share."""
