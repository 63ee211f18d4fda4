-- secrets: random keys made once per database (page tokens are signed with one)
CREATE TABLE secrets (
    name TEXT NOT NULL PRIMARY KEY,
    value BYTEA NOT NULL
);
