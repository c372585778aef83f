"""Django settings for django-celery-beat in test_celery_beat.py: one SQLite
file (`Z4J_E2E_BEAT_DB`), the app's tables only."""

import os

SECRET_KEY = "z4j-agentd-e2e-only"
INSTALLED_APPS = ["django_celery_beat"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["Z4J_E2E_BEAT_DB"],
                         "OPTIONS": {"timeout": 20}}}
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
