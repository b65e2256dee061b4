-- User states are stored compressed (actors::state_codec): bytes, not text. The JSON text that
-- earlier versions stored stays readable as its UTF-8 bytes.
ALTER TABLE user_state ALTER COLUMN state TYPE BYTEA USING convert_to(state, 'UTF8');
