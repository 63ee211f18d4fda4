-- secrets: random keys made once per database (page tokens are signed with one)
CREATE TABLE secrets (
    name VARCHAR NOT NULL PRIMARY KEY,
    value BLOB NOT NULL
);
