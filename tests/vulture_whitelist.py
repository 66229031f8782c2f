"""Names vulture (``make test``: ``vulture ... --min-confidence 80``) reports as unused that are used, one line each
saying by whom. Read by vulture only: a list of names, never imported."""

dotenv_settings  # service/settings.py: pydantic-settings passes settings_customise_sources's sources by keyword
file_secret_settings  # service/settings.py: the same keyword call; we do not read .env or secret files
userdata  # service/signals/mqtt.py: paho-mqtt 2 callback signature (positional, not read)
properties  # service/signals/mqtt.py: paho-mqtt 2 callback signature (MQTT 5 properties; we speak 3.1.1)
