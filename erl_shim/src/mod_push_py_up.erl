%%%----------------------------------------------------------------------
%%% mod_push_py_up: ejabberd as a UnifiedPush server (the XMPP side of
%%% http://gultsch.de/xmpp/drafts/unified-push and the HTTP endpoints), on a host whose
%%% option unified_push_url is set. What is cheap and needs no state is answered here:
%%% the access rule and push_iq_rate of the register IQ, CORS, the discovery GET,
%%% malformed tokens, tokens of other hosts, empty and oversized bodies. Python decides
%%% the rest: the register IQ goes as an up_register event (answered like a push IQ), a
%%% POST as an up_post event, answered by an http_reply action; Python's up_push actions
%%% are executed here (the IQ to the registered session, or at once offline/pending).
%%%
%%% Two tables: the UnifiedPush users of the host (bare {U, S}, Python's
%%% {unified_push, {users, ...}} actions, the port owner's), and the c2s processes of
%%% their sessions that went pending (the keeper's, written by the sessions).
%%% docs/protocol.md of pymod_push has the events and actions.
%%%
%%% Copyright (C) 2026 the pymod_push authors. GPL-2.0-or-later.
%%%----------------------------------------------------------------------
-module(mod_push_py_up).

%% mod_push_py: starting, stopping, the HTTP handler, the c2s hooks' questions
-export([start/1, stop/1, process/2, session_pending/1, session_resumed/2, presence/2]).
%% the IQ handler and the disco hook
-export([decode_iq_subel/1, process_iq/1, disco_local_features/5]).
%% the port owner: actions, IQ replies, tables
-export([execute/2, iq_reply/3, sweep/1, pending_table/1, users_table/1]).

-include("xmpp.hrl").
-include("logger.hrl").
-include("translate.hrl").
-include("ejabberd_http.hrl").

-import(mod_push_py_opt, [opt/2]).

-define(NS_UP, <<"http://gultsch.de/xmpp/drafts/unified-push">>).
-define(MAX_BODY, 4096).  % bytes of a push message (RFC 8291 content), at most
-define(WAIT, 10000).  % how long a POST waits for Python's answer, in milliseconds
-define(SECRET_LEN, 43).  % base64url (no padding) of the token's 32 random bytes
-define(MAX_HOST_LEN, 1364).  % base64url of 1023 bytes

-type http_answer() :: {pos_integer(), binary(), [{binary(), binary()}], binary()}.

%%%===================================================================
%%% Started and stopped with mod_push_py (start, stop, reload)
%%%===================================================================
-spec start(binary()) -> ok.
start(Host) ->
    case opt(Host, unified_push_url) of
        undefined -> ok;
        _ ->
            gen_iq_handler:add_iq_handler(ejabberd_local, Host, ?NS_UP, ?MODULE, process_iq),
            ejabberd_hooks:add(disco_local_features, Host, ?MODULE, disco_local_features, 50),
            ok
    end.

-spec stop(binary()) -> ok.
stop(Host) ->
    gen_iq_handler:remove_iq_handler(ejabberd_local, Host, ?NS_UP),
    ejabberd_hooks:delete(disco_local_features, Host, ?MODULE, disco_local_features, 50),
    ok.

%% The UnifiedPush users (bare {U, S}) of a host, kept by Python's actions.
-spec users_table(binary()) -> atom().
users_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_up_users).

%% The c2s processes of UnifiedPush users' sessions that went pending ({Pid}); a resumed
%% session runs in a new process, so an entry stays until its process ends (sweep/1).
-spec pending_table(binary()) -> atom().
pending_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_up_pending).

%%%===================================================================
%%% The register IQ (ejabberd_local) and disco#info of the host
%%%===================================================================
%% gen_iq_handler calls this instead of xmpp:decode/1, which knows no codec for this
%% namespace before p1_xmpp 1.11 (an unknown element would be a bad-request).
-spec decode_iq_subel(xmlel() | xmpp_element()) -> xmlel() | xmpp_element().
decode_iq_subel(El) ->
    El.

-spec process_iq(iq()) -> ignore | iq().
process_iq(#iq{from = #jid{luser = U, lserver = S} = From, to = #jid{lserver = Host},
               type = Type, lang = Lang} = IQ) ->
    case mod_push_py:may_use_backends(Host, opt(Host, unified_push_access), From) of
        false ->
            Text = ?T("UnifiedPush registration is for this server's users"),
            xmpp:make_error(IQ, xmpp:err_forbidden(Text, Lang));
        true when Type == get ->
            Text = ?T("A UnifiedPush registration is an IQ of type 'set'"),
            xmpp:make_error(IQ, xmpp:err_bad_request(Text, Lang));
        true ->
            case [xmpp:encode(El) || El <- xmpp:get_els(IQ)] of
                [#xmlel{name = <<"register">>} = El] ->
                    case mod_push_py:take_token(Host, {up_iqs, U, S}) of
                        {wait, Seconds} ->
                            xmpp:make_error(IQ, mod_push_py:too_many(
                                                  <<"UnifiedPush registrations">>, Host,
                                                  Seconds, Lang));
                        ok ->
                            Ref = make_ref(),
                            mod_push_py_port:send_iq(Host, IQ, Ref,
                                                     {up_register, Ref, jid:tolower(From), Lang,
                                                      mod_push_py:xml_binary(El)}),
                            ignore
                    end;
                _ ->
                    Text = ?T("The only UnifiedPush request is <register/>"),
                    xmpp:make_error(IQ, xmpp:err_bad_request(Text, Lang))
            end
    end.

-spec disco_local_features(empty | {result, [binary()]} | {error, stanza_error()},
                           jid(), jid(), binary(), binary()) ->
          empty | {result, [binary()]} | {error, stanza_error()}.
disco_local_features(empty, From, To, <<"">>, Lang) ->
    disco_local_features({result, []}, From, To, <<"">>, Lang);
disco_local_features({result, Features}, _From, _To, <<"">>, _Lang) ->
    {result, [?NS_UP | Features]};
disco_local_features(Acc, _From, _To, _Node, _Lang) ->
    Acc.

%%%===================================================================
%%% The c2s hooks' questions (mod_push_py), in the sessions' processes
%%%===================================================================
%% The hosts of this server where the user has UnifiedPush endpoints (usually their own;
%% unified_push_access may let users of other hosts register). Only for rare events:
%% sessions going pending or resumed, presences to a host.
up_hosts({U, S, _R}) ->
    [Host || Host <- ejabberd_option:hosts(), up_user(Host, {U, S})].

up_user(Host, User) ->
    try ets:member(users_table(Host), User)
    catch error:badarg -> false  % no UnifiedPush user there (the first makes the table)
    end.

%% A session goes pending (run by the c2s process): a UnifiedPush user's is noted, so
%% that a push for it is kept rather than queued in the session (execute/2).
-spec session_pending({binary(), binary(), binary()}) -> ok.
session_pending(Key) ->
    [try ets:insert(pending_table(Host), {self()})
     catch error:badarg -> ok  % a keeper started by older code: no table until restart
     end || Host <- up_hosts(Key)],
    ok.

%% A session was resumed: session_resumed to the hosts where the user has endpoints
%% (Notified: their own host had it already, as a push-enabled session's).
-spec session_resumed({binary(), binary(), binary()}, boolean()) -> ok.
session_resumed({_, S, _} = Key, Notified) ->
    [mod_push_py_port:send_event(Host, {session_resumed, Key})
     || Host <- up_hosts(Key), not (Notified andalso Host == S)],
    ok.

%% An available presence to a host's bare JID: up_presence for that host when the user
%% has endpoints there (a remote domain is never looked up: no atom is made for it).
-spec presence(binary(), {binary(), binary(), binary()}) -> ok.
presence(ToHost, {U, S, _} = Key) ->
    case lists:member(ToHost, ejabberd_option:hosts()) andalso up_user(ToHost, {U, S}) of
        true -> mod_push_py_port:send_event(ToHost, {up_presence, Key});
        false -> ok
    end.

pending(Host, Pid) when is_pid(Pid) ->
    try ets:member(pending_table(Host), Pid)
    catch error:badarg -> false
    end;
pending(_Host, none) ->
    false.

%% Entries of processes that ended (every 10 s, by the port owner).
-spec sweep(binary()) -> ok.
sweep(Host) ->
    Table = pending_table(Host),
    try ets:foldl(fun({Pid}, Dead) ->
                          case is_process_alive(Pid) of
                              true -> Dead;
                              false -> [Pid | Dead]
                          end
                  end, [], Table) of
        Dead -> [ets:delete(Table, Pid) || Pid <- Dead], ok
    catch error:badarg -> ok
    end.

%%%===================================================================
%%% Python's actions, executed by the port owner (in its process)
%%%===================================================================
-spec execute(binary(), tuple()) -> ok.
execute(Host, {unified_push, {users, What, Users}}) when is_list(Users) ->
    Table = users_table(Host),
    case ets:info(Table, size) of
        undefined -> ets:new(Table, [named_table, set, protected, {read_concurrency, true}]);
        _ -> ok
    end,
    case What of
        reset -> ets:delete_all_objects(Table), ets:insert(Table, [{U, true} || U <- Users]);
        add -> ets:insert(Table, [{U, true} || U <- Users]);
        remove -> [ets:delete(Table, U) || U <- Users]
    end,
    ok;
%% A push to the session that registered the endpoint; its answer (or none in time)
%% comes back to the port owner as {iq_reply, Reply, Ctx} (iq_reply/3). Without a
%% session, or with a pending one, the outcome is known at once.
execute(Host, {up_push, Ref, {U, S, R} = Target, Application, Instance, Payload, Timeout}) ->
    Pid = ejabberd_sm:get_session_pid(U, S, R),
    case {Pid, pending(Host, Pid), jid:make(U, S, R)} of
        {none, _, _} -> mod_push_py_port:send_event(Host, {iq_reply, Ref, offline});
        {_, _, error} -> mod_push_py_port:send_event(Host, {iq_reply, Ref, offline});
        {_, true, _} -> mod_push_py_port:send_event(Host, {iq_reply, Ref, pending});
        {_, false, To} ->
            Push = #xmlel{name = <<"push">>,
                          attrs = [{<<"xmlns">>, ?NS_UP}, {<<"application">>, Application},
                                   {<<"instance">>, Instance}],
                          children = [{xmlcdata, base64:encode(Payload)}]},
            IQ = #iq{type = set, from = jid:make(Host), to = To, sub_els = [Push]},
            ejabberd_router:route_iq(IQ, {?MODULE, Ref, Target, Pid}, self(), Timeout),
            ok
    end;
%% Python's answer to a POST, to the HTTP connection's process waiting for it (process/2).
execute(_Host, {http_reply, {Pid, _} = Ref, Status, Headers, Body})
  when is_pid(Pid), is_integer(Status), Status >= 200, Status =< 599, is_list(Headers),
       is_binary(Body) ->
    Pid ! {?MODULE, Ref, Status, Headers, Body},
    ok;
execute(_Host, Action) ->  % by its name only: a payload or a body is never logged
    ?WARNING_MSG("mod_push_py: malformed UnifiedPush action from Python ignored: ~P",
                 [element(1, Action), 2]).

%% The event an IQ's answer (or its timeout) makes: for an up_push, a timeout while
%% the session is pending is {timeout, pending} (the IQ waits in the session's queue: it
%% is sent again on resume, bounced if the session ends); publishes as they are.
-spec iq_reply(binary(), timeout | iq(), term()) -> {iq_reply, term(), term()}.
iq_reply(Host, timeout, {?MODULE, Ref, {U, S, R}, Pid}) ->
    case pending(Host, Pid) orelse pending(Host, ejabberd_sm:get_session_pid(U, S, R)) of
        true -> {iq_reply, Ref, {timeout, pending}};
        false -> {iq_reply, Ref, timeout}
    end;
iq_reply(_Host, Reply, {?MODULE, Ref, _Target, _Pid}) ->
    {iq_reply, Ref, mod_push_py_actions:publish_outcome(Reply)};
iq_reply(_Host, Reply, Ref) ->
    {iq_reply, Ref, mod_push_py_actions:publish_outcome(Reply)}.

%%%===================================================================
%%% The HTTP endpoints: mod_push_py:process/2 (ejabberd_http), in the connection's process
%%%===================================================================
%% LocalPath: the path below the handler's prefix; an endpoint is <prefix>/<token>.
%% Every status goes with its reason phrase: ejabberd 23.01 knows none for 429.
-spec process([binary()], #request{}) -> http_answer().
process(_LocalPath, #request{method = 'OPTIONS'}) ->
    answer(204, [{<<"Access-Control-Allow-Methods">>, <<"GET, POST, OPTIONS">>},
                 {<<"Access-Control-Allow-Headers">>,
                  <<"content-type, content-encoding, ttl, urgency, topic, authorization">>},
                 {<<"Access-Control-Max-Age">>, <<"86400">>}], <<>>);
process([Token], #request{method = Method} = Request) ->
    case endpoint_host(Token) of
        {ok, Host} -> endpoint(Method, Host, Token, Request);
        error -> text(404, <<"No such UnifiedPush endpoint">>)
    end;
process(_LocalPath, _Request) ->  % <token>/m/<id> (a message's Location) included
    text(404, <<"No such UnifiedPush endpoint">>).

endpoint(Method, _Host, _Token, _Request) when Method == 'GET'; Method == 'HEAD' ->
    answer(200, [{<<"Content-Type">>, <<"application/json">>}],
           <<"{\"unifiedpush\":{\"version\":1}}">>);
endpoint('POST', _Host, _Token, #request{data = <<>>}) ->
    text(400, <<"Empty body: a push message has 1 to 4096 bytes">>);
endpoint('POST', _Host, _Token, #request{data = Data}) when byte_size(Data) > ?MAX_BODY ->
    text(413, <<"Body over 4096 bytes">>);
endpoint('POST', Host, Token, #request{data = Data, headers = Headers})
  when is_binary(Data) ->
    flush_late(),
    Ref = {self(), make_ref()},
    Meta = #{ttl => header(<<"ttl">>, Headers), urgency => header(<<"urgency">>, Headers),
             topic => header(<<"topic">>, Headers),
             deadline => erlang:system_time(millisecond) + ?WAIT},
    mod_push_py_port:send_event(Host, {up_post, Ref, Token, Meta, Data}),
    receive
        {?MODULE, Ref, Status, ReplyHeaders, Body} ->
            answer(Status, with_content_type(ReplyHeaders), Body)
    after ?WAIT ->
            answer(503, [{<<"Retry-After">>, <<"10">>},
                         {<<"Content-Type">>, <<"text/plain; charset=utf-8">>}],
                   <<"The push service is busy: retry later">>)
    end;
endpoint(_Method, _Host, _Token, _Request) ->
    answer(405, [{<<"Allow">>, <<"GET, POST, OPTIONS">>},
                 {<<"Content-Type">>, <<"text/plain; charset=utf-8">>}],
           <<"Only GET, POST and OPTIONS">>).

%% Answers that came after their POST's 503, on this (kept-alive) connection: dropped.
flush_late() ->
    receive {?MODULE, _, _, _, _} -> flush_late()
    after 0 -> ok
    end.

%% The token is base64url(host) "." base64url(32 random bytes); the host must run this
%% module with unified_push_url set (the HTTP Host header is never used).
endpoint_host(Token) ->
    case binary:split(Token, <<".">>) of
        [Encoded, Secret] when byte_size(Secret) == ?SECRET_LEN, Encoded /= <<>>,
                               byte_size(Encoded) =< ?MAX_HOST_LEN ->
            case base64url(Secret) andalso base64url(Encoded) andalso decode(Encoded) of
                {ok, Host} ->
                    case enabled(Host) of
                        true -> {ok, Host};
                        false -> error
                    end;
                _ -> error
            end;
        _ -> error
    end.

base64url(Bin) ->
    lists:all(fun(C) -> (C >= $a andalso C =< $z) orelse (C >= $A andalso C =< $Z)
                            orelse (C >= $0 andalso C =< $9) orelse C == $- orelse C == $_
              end, binary_to_list(Bin)).

decode(Encoded) ->
    Std = << <<(case C of $- -> $+; $_ -> $/; _ -> C end)>> || <<C>> <= Encoded >>,
    Padded = case byte_size(Std) rem 4 of
                 0 -> Std;
                 2 -> <<Std/binary, "==">>;
                 3 -> <<Std/binary, "=">>;
                 1 -> error
             end,
    try {ok, base64:decode(Padded)}
    catch _:_ -> error
    end.

enabled(Host) ->
    try gen_mod:is_loaded(Host, mod_push_py) andalso opt(Host, unified_push_url) /= undefined
    catch _:_ -> false
    end.

%% A request header by its lower-case name (ejabberd_http gives names it does not know
%% as binaries, capitalised: <<"Ttl">>), the raw value or undefined.
header(Name, Headers) ->
    case [Value || {Key, Value} <- Headers, is_binary(Key), string:lowercase(Key) == Name] of
        [Value | _] -> Value;
        [] -> undefined
    end.

with_content_type(Headers) ->
    case [K || {K, _} <- Headers, string:lowercase(K) == <<"content-type">>] of
        [] -> [{<<"Content-Type">>, <<"text/plain; charset=utf-8">>} | Headers];
        _ -> Headers
    end.

text(Status, Text) ->
    answer(Status, [{<<"Content-Type">>, <<"text/plain; charset=utf-8">>}], Text).

%% CORS for app servers in browsers, as Prosody's module does.
answer(Status, Headers, Body) ->
    {Status, reason(Status),
     [{<<"Access-Control-Allow-Origin">>, <<"*">>},
      {<<"Access-Control-Expose-Headers">>, <<"TTL, Location, Retry-After">>} | Headers],
     Body}.

reason(200) -> <<"OK">>;
reason(201) -> <<"Created">>;
reason(202) -> <<"Accepted">>;
reason(204) -> <<"No Content">>;
reason(400) -> <<"Bad Request">>;
reason(403) -> <<"Forbidden">>;
reason(404) -> <<"Not Found">>;
reason(405) -> <<"Method Not Allowed">>;
reason(410) -> <<"Gone">>;
reason(413) -> <<"Payload Too Large">>;
reason(429) -> <<"Too Many Requests">>;
reason(500) -> <<"Internal Server Error">>;
reason(503) -> <<"Service Unavailable">>;
reason(Status) when Status < 300 -> <<"Success">>;
reason(Status) when Status < 500 -> <<"Client Error">>;
reason(_) -> <<"Server Error">>.
