"""YAML experiments: the schema, running every dataset and candidate, combining and ranking.

:mod:`.schema` validates a config (every problem at once) and applies ``key.path=value``
overrides; :mod:`.run` executes it on the engine, one sub-run per dataset with the models loaded
once, then combines datasets, ranks candidates, evaluates gates and adds the noise floor.
"""
