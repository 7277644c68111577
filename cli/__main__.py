from reflectagent.cli import app

app()
