# Shared by the CGI scripts of the test guest's application (sourced, busybox sh).
# State: /run/app (tmpfs = guest RAM): token, counter, boot-id; /data/app/message.txt on the disk.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
STATE=/run/app
MESSAGE_FILE=/data/app/message.txt

# Print stdin as a JSON string literal. Control characters other than \t \n \r are dropped.
json_str() {
  { cat; printf '#'; } | tr -d '\000-\010\013\014\016-\037\177' \
    | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g' -e 's/\r/\\r/g' \
    | awk 'BEGIN { printf "\"" } NR > 1 { printf "%s\\n", prev } { prev = $0 } END { sub(/#$/, "", prev); printf "%s\"", prev }'
}

# respond STATUS REASON BODY: a complete HTTP response with a JSON body (busybox httpd passes
# CGI output that starts with "HTTP/" through unchanged).
respond() {
  printf 'HTTP/1.0 %s %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n\r\n%s\n' "$1" "$2" "$3"
}
fail() { # STATUS REASON MESSAGE
  respond "$1" "$2" "{\"error\": $(printf '%s' "$3" | json_str)}"
  exit 0
}

# A lock made of mkdir (atomic); a stale lock is broken after ~2 s.
app_lock() {
  n=0
  until mkdir "$STATE/lock" 2>/dev/null; do
    n=$((n + 1))
    [ $n -gt 200 ] && break
    usleep 10000
  done
}
app_unlock() { rmdir "$STATE/lock" 2>/dev/null; }

# Increment the in-memory counter and print the state as one line of JSON.
next_state() {
  app_lock
  read -r counter < "$STATE/counter"
  counter=$((counter + 1))
  echo "$counter" > "$STATE/counter"
  app_unlock
  read -r boot_id < "$STATE/boot-id"
  token=$(cat "$STATE/token")
  disk=$(cat "$MESSAGE_FILE" 2>/dev/null)
  printf '{"token": %s, "disk": %s, "counter": %s, "bootId": "%s"}' \
    "$(printf '%s' "$token" | json_str)" "$(printf '%s' "$disk" | json_str)" "$counter" "$boot_id"
}

# query_param NAME: the URL-decoded value of NAME in $QUERY_STRING (empty if absent);
# query_has NAME: whether NAME is present.
query_param() {
  old_ifs=$IFS; IFS='&'
  for kv in $QUERY_STRING; do
    if [ "${kv%%=*}" = "$1" ]; then
      IFS=$old_ifs
      case "$kv" in *=*) httpd -d "${kv#*=}" ;; esac
      return 0
    fi
  done
  IFS=$old_ifs
}
query_has() {
  case "&$QUERY_STRING&" in *"&$1="*|*"&$1&"*) return 0 ;; esac
  return 1
}
