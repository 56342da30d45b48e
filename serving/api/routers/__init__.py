"""The API's routers: chat (OpenAI inference), feedback, admin. The app factory includes them."""
